"""Data preparation, from a recipe to training data: paths -> split -> token stores -> views -> plan.

``prepare_corpus(cfg, inputs)`` does the work and returns a :class:`PreparedData` (stores, split,
units of every stream and validation set, the plan, the dataset fingerprint) with a
``datamodule()`` factory; ``prepare_data(cfg, inputs)`` is the datamodule itself (what training
uses; ``dm.prepared`` holds the rest). The dry-run report built on top of this lives in
:mod:`megadoc_pl.dryrun`.

What is read comes in a :class:`CorpusInputs`: the real corpus and tokenizer paths, and the
generations as paths or as a provider called once the validation split is decided (so held-out
documents are never seeds). Without one, the recipe's ``data.real`` / ``data.tokenizer`` /
``data.synthetic`` are read. This layer imports nothing above it: the built-in demo plugs in
from the entry points (``megadoc_pl.demo.corpus_inputs``). Token stores are cached under
``data.cache_dir/stores`` in directories named by what decides their content (input files,
tokenizer, options); the store itself verifies content fingerprints and refuses a mismatch
unless ``data.rebuild``.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Protocol, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf

from megadoc_pl.data.hygiene import (
    check_content_disjoint,
    check_heldout_generations,
    check_units_disjoint,
    heldout_duplicates,
    member_mask,
    text_hashes,
)
from megadoc_pl.data.mixture import REAL, SYNTHETIC, MixturePlan, budget_plan, paper_plan
from megadoc_pl.data.units import Units
from megadoc_pl.data.view_cache import cached_real_fraction, cached_real_units, cached_view, exclusion_key
from megadoc_pl.data.views import VIEW_TASKS, ViewOptions, documents_units
from megadoc_pl.data.windows import SharedPasses, StreamWindows, Windows
from megadoc_pl.errors import BadInput
from megadoc_pl.utils import NotCached, file_lock, get_logger, json_fingerprint

if TYPE_CHECKING:  # Lightning is imported only when a datamodule is made (dry runs stay light)
    from megadoc_pl.data.datamodule import MegadocDataModule

# data.* keys that do not change which tokens a window holds (left out of the fingerprint).
# drop_heldout_generations: without it held-out generations are an error, so it never changes a window.
_RUNTIME_KEYS = ("num_workers", "cache_dir", "rebuild", "skip_bad_rows", "drop_heldout_generations")
_log = get_logger("data")
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)  # a cache_dir that cannot take a store


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
        return [str(v) for v in value]
    return [str(value)]


class GenerationProvider(Protocol):
    """Generations made on demand: the rows file of ``task`` for the real corpus, with no document
    held out in ``split_file`` used as a seed (built on first use, then cached by the provider)."""

    def __call__(self, task: str, split_file: Path) -> Path: ...


@dataclass(frozen=True)
class CorpusInputs:
    """What preparation reads: the real corpus, its tokenizer and the generations the view needs,
    as files (``synthetic``) or from ``generate``, asked once per task of the view after the split."""

    real: tuple[str, ...]  # JSONL / Parquet files or directories of the real documents
    tokenizer: str  # tokenizer.json or a tokenizer directory
    synthetic: tuple[str, ...] = ()  # generation files or directories (data.synthetic)
    generate: Optional[GenerationProvider] = None  # used when ``synthetic`` is empty

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "CorpusInputs":
        """The recipe's own paths: ``data.real``, ``data.tokenizer`` and ``data.synthetic``."""
        data = cfg.data
        if data.real is None:
            raise BadInput("data.real is not set and no corpus inputs were given (fix: set data.real and "
                           "data.tokenizer, or pass megadoc_pl.demo.corpus_inputs(cfg) for the built-in demo)")
        if data.tokenizer is None:
            raise BadInput("data.real is set but data.tokenizer is not (fix: data.tokenizer=path/to/tokenizer.json)")
        return cls(tuple(_as_list(data.real)), str(data.tokenizer), tuple(_as_list(data.synthetic)))


@dataclass
class PreparedData:
    """Everything data-side of a recipe, ready to make windows."""

    cfg: DictConfig
    tokenizer: Any  # data.tokenizer.TokenizerInfo
    real: Any  # TokenStore of the real documents (held-out ones included)
    synthetic: Any  # TokenStore of the generations, or None
    split_file: Path
    heldout: set[str]
    real_units: Units
    synthetic_units: Optional[Units]
    val_units: dict[str, Units]
    plan: MixturePlan
    fingerprint: str
    paths: dict = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    @property
    def max_steps(self) -> int:
        return run_steps(self.cfg, self.plan)

    @property
    def scope(self) -> str:
        return str(self.cfg.model.attention_scope)

    def train_windows(self) -> Windows:
        seed = int(self.cfg.train.data_seed)
        T = int(self.cfg.data.seq_len)
        order = str(self.cfg.data.window_order)
        # The ranks of a node and their loader workers share each pass's unit order and window
        # table, and the streams' offsets (at 100M documents ~2 GB a process otherwise).
        shared = SharedPasses(Path(self.cfg.data.cache_dir) / "passes")
        streams = {REAL: StreamWindows(self.real_units, T, seed, REAL, window_order=order, shared=shared)}
        if self.synthetic_units is not None:
            streams[SYNTHETIC] = StreamWindows(self.synthetic_units, T, seed, SYNTHETIC, window_order=order,
                                               shared=shared)
        return Windows.from_plan(streams, self.plan, self.scope, length=self.max_steps * self.plan.global_batch_size)

    def val_windows(self) -> dict[str, Windows]:
        val = self.cfg.data.val
        scope = str(val.scope) if val.scope is not None else self.scope
        out = {}
        for name, units in self.val_units.items():
            w = Windows.sequential(units, int(self.cfg.data.seq_len), scope, val.max_windows)
            if len(w) == 0:
                _log.info(f"validation set '{name}' has {units.num_tokens} tokens, less than one window "
                     f"of {int(self.cfg.data.seq_len) + 1}: skipped")
                continue
            out[name] = w
        return out

    def windows(self, split: str) -> Windows:
        """The windows of ``train`` or ``val/NAME``."""
        if split == "train":
            return self.train_windows()
        val = self.val_windows()
        if split.startswith("val/") and split[4:] in val:
            return val[split[4:]]
        names = ", ".join(["train"] + [f"val/{n}" for n in val])
        raise ValueError(f"--split {split!r} is not one of {names}")

    def datamodule(self) -> "MegadocDataModule":
        from megadoc_pl.data.datamodule import MegadocDataModule

        dm = MegadocDataModule(self.train_windows(), self.val_windows(), self.plan,
                               micro_batch_size=int(self.cfg.train.micro_batch_size), max_steps=self.max_steps,
                               num_workers=int(self.cfg.data.num_workers), fingerprint=self.fingerprint)
        dm.prepared = self
        dm.vocab_size = self.vocab_size
        return dm


# --------------------------------------------------------------------------------------------
# Paths and stores


def _needs_synthetic(cfg: DictConfig) -> bool:
    return str(cfg.data.view) != "real"


def _store_dir(cfg: DictConfig, kind: str, files: Sequence[Path], tokenizer: Any, extra: dict) -> Path:
    # Named by cheap facts (path, size, mtime); the store checks content fingerprints itself.
    key = {"kind": kind, "tokenizer": tokenizer.fingerprint, "add_bos": bool(cfg.data.add_bos),
           "add_eos": bool(cfg.data.add_eos), "skip_bad_rows": bool(cfg.data.skip_bad_rows), **extra,
           "files": [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]}
    return Path(cfg.data.cache_dir) / "stores" / f"{kind}-{json_fingerprint(key)[:16]}"


def _build_store(cfg: DictConfig, inputs: Sequence[str], tokenizer: Any, kind: str, what: str):
    from megadoc_pl.data.readers import expand_inputs
    from megadoc_pl.data.store_build import build_store

    files = expand_inputs(inputs)
    extra = {"text_field": str(cfg.data.text_field), "id_field": str(cfg.data.id_field)} if kind == "documents" else {}
    out = _store_dir(cfg, kind, files, tokenizer, extra)
    if not (out / "manifest.json").exists() and not _CACHED_ONLY.get():  # said once: by the pass that builds
        _log.info(f"tokenizing {what} ({len(files)} file(s)) -> {out}")
    kw = dict(kind=kind, add_bos=bool(cfg.data.add_bos), add_eos=bool(cfg.data.add_eos),
              skip_bad_rows=bool(cfg.data.skip_bad_rows), rebuild=bool(cfg.data.rebuild),
              cached_only=_CACHED_ONLY.get())
    if kind == "documents":
        kw.update(text_field=str(cfg.data.text_field), id_field=str(cfg.data.id_field))
    try:
        return build_store(files, tokenizer, out, **kw)
    except OSError as e:
        if e.errno is not None and e.errno not in _NO_ROOM:
            raise
        raise _no_room(cfg, e, f"the token store {out.name}") from None


def _no_room(cfg: DictConfig, e: OSError, what: str) -> BadInput:
    """The one line for a cache_dir that cannot take what preparation writes there."""
    reason = e.strerror or (os.strerror(errno.ENOSPC) if "[errno 28]" in str(e).lower()  # pyarrow's
                            else f"a short write, {e}: the filesystem is full")  # numpy's tofile sets no errno
    return BadInput(f"data.cache_dir={cfg.data.cache_dir}: cannot write {what} ({reason}) (fix: free space "
                    "there, or point data.cache_dir at a writable filesystem with room)")


def _is_full(e: OSError) -> bool:
    """A write that met a full filesystem or quota (pyarrow and numpy's short writes carry no errno)."""
    if e.errno is not None:
        return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    return "[errno 28]" in str(e).lower() or "requested and" in str(e)


def _split(cfg: DictConfig, real) -> tuple[Path, set[str], dict[str, list[str]]]:
    """The validation split file (decided once, before generation), its held-out ids and sets."""
    from megadoc_pl.data import split as split_mod

    val = cfg.data.val
    if val.split_file is not None:
        path = Path(str(val.split_file))
    else:
        key = {"real": real.manifest.get("inputs"), "tokenizer": real.manifest.get("tokenizer_fingerprint"),
               "val": OmegaConf.to_container(val, resolve=True)}
        for k in ("max_windows", "scope", "interval", "split_file", "extra"):
            key["val"].pop(k, None)
        path = Path(cfg.data.cache_dir) / "splits" / f"split-{json_fingerprint(key)[:16]}.json"
    if _CACHED_ONLY.get() and not path.exists():
        raise NotCached(f"split {path}")
    try:
        split = split_mod.ensure_split(real, val, path)
    except OSError as e:
        if not _is_full(e):
            raise
        if val.split_file is not None:  # the user's path, not the cache
            raise BadInput(f"data.val.split_file={path}: cannot write it ({e.strerror or e}) (fix: free space "
                           "there, or point data.val.split_file at a filesystem with room)") from None
        raise _no_room(cfg, e, f"the split file {path.name}") from None
    heldout = set(split_mod.load_heldout_ids(path))
    missing = split_mod.missing_heldout_ids(path, heldout, real.arrow_column("source_id"))
    if missing:
        _log.warning(f"{path}: {missing} of its {len(heldout)} held-out ids are not documents of the real corpus")
    sets = {name: list(ids) for name, ids in split["sets"].items()} if isinstance(split, dict) else dict(split.sets)
    return path, heldout, sets


def _synthetic_inputs(cfg: DictConfig, inputs: CorpusInputs, split_file: Path) -> list[str]:
    """The generation files: the given ones, or the provider's for every task the view needs."""
    if inputs.synthetic:
        return list(inputs.synthetic)
    view = str(cfg.data.view)
    tasks = VIEW_TASKS[view]
    if inputs.generate is None:
        names = " and ".join(f"'{t}'" for t in tasks)
        flags = " and ".join(f"--task {t}" for t in tasks)
        raise BadInput(f"data.view={view} needs generations of task {names} but data.synthetic is not set "
                       f"(fix: generate them with tools/synthesize.py {flags} and set data.synthetic)")
    return [str(inputs.generate(task, split_file)) for task in tasks]


def prepare_corpus(cfg: DictConfig, inputs: Optional[CorpusInputs] = None) -> PreparedData:
    """Stores, split, units and the plan of a recipe (tokenizing on first use, cached).

    ``cfg`` is a validated recipe (``megadoc_pl.recipes.validate_recipe``, which the entry points
    run once); it is not checked again here. ``inputs`` names what to read (default: the
    recipe's ``data.real``, ``data.tokenizer`` and ``data.synthetic``).

    Safe to call from every rank of a launch at once. Each process first reads what is cached
    under a shared lock on ``data.cache_dir`` (so the ranks of a relaunch prepare side by side,
    not one after the other: input fingerprints come from the stores' stat caches, a relaunch on
    unchanged inputs reads no input file). One that meets something missing lets go and takes the
    exclusive lock: the first to get it builds what is missing while the others wait, then find it
    all cached. A node-local cache gets one preparation per node.
    """
    if inputs is None:
        inputs = CorpusInputs.from_config(cfg)
    try:
        return _prepare_locked(cfg, inputs)
    except OSError as e:  # every file is written atomically: a full disk leaves no half-written one
        if not _is_full(e):
            raise
        raise _no_room(cfg, e, _cache_path(cfg, e)) from None


def _cache_path(cfg: DictConfig, e: OSError) -> str:
    """What a failed write names: its file under data.cache_dir, else the prepared data."""
    if e.filename:
        try:
            return str(Path(e.filename).relative_to(Path(cfg.data.cache_dir)))
        except ValueError:
            return str(e.filename)
    return "a file of the prepared data"


def _prepare_locked(cfg: DictConfig, inputs: CorpusInputs) -> PreparedData:
    """:func:`prepare_corpus` under the cache's locks: cached data under the shared one, then building."""
    cache = Path(cfg.data.cache_dir)
    _remove_leftovers_if_alone(cache)
    if not bool(cfg.data.rebuild):
        token = _CACHED_ONLY.set(True)
        try:
            with preparation_lock(cache, shared=True):
                return _prepare_corpus(cfg, inputs)
        except NotCached as e:
            _log.debug(f"not cached yet: {e}")
        finally:
            _CACHED_ONLY.reset(token)
    with preparation_lock(cache):
        remove_leftovers(cache)
        return _prepare_corpus(cfg, inputs)


def _remove_leftovers_if_alone(cache_dir: Path) -> None:
    """:func:`remove_leftovers` when no other process holds the preparation lock, without waiting
    for it: a relaunch that finds everything cached never takes the exclusive lock, and would
    otherwise keep a killed build's files forever."""
    lock = cache_dir / ".prepare.lock"
    if not lock.is_file():
        return  # a new cache: nothing to remove
    try:
        with file_lock(lock, wait=False):
            remove_leftovers(cache_dir)
    except BlockingIOError:
        pass  # another process prepares: the leftovers wait for a start that finds it alone
    except PermissionError:
        pass  # a read-only cache (the shared pass reads it; building would say what is wrong)


# Set while a preparation may only read what is cached (prepare_corpus's shared-lock pass).
_CACHED_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("megadoc_pl_cached_only", default=False)


def remove_leftovers(cache_dir: Path) -> list[Path]:
    """Delete what a killed preparation left in ``cache_dir`` (half-built ``.*.partial`` stores and
    views, ``.*.tmp`` files). Called under the exclusive :func:`preparation_lock`, so no live
    preparation owns them. ``passes/`` is left alone: training processes write there under locks of
    their own, and clear their dead writers' files themselves (:class:`SharedPasses`)."""
    import shutil

    found = (sorted(cache_dir.glob("stores/.*.partial")) + sorted(cache_dir.glob("views/.*.partial"))
             + sorted(p for p in cache_dir.glob("*/.*.tmp") if p.parent.name != "passes"))
    for p in found:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        _log.info(f"removed {p}, left by an interrupted preparation")
    return found


@contextlib.contextmanager
def preparation_lock(cache_dir: Path, shared: bool = False) -> Iterator[None]:
    """Exclusive (or shared) lock on ``cache_dir/.prepare.lock``, saying so when it has to wait."""
    lock = cache_dir / ".prepare.lock"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock.touch()
    except OSError as e:
        raise BadInput(f"data.cache_dir={cache_dir}: cannot create or write it ({e.strerror}) "
                       "(fix: point data.cache_dir at a writable directory)") from None
    with file_lock(lock, waiting=f"waiting for another process preparing data in {cache_dir}", shared=shared):
        yield


def _prepare_corpus(cfg: DictConfig, inputs: CorpusInputs) -> PreparedData:
    from megadoc_pl.data.tokenizer import load_tokenizer

    data = cfg.data
    opts = ViewOptions.from_config(cfg.data, int(cfg.train.data_seed))
    real_inputs = list(inputs.real)
    tok = load_tokenizer(inputs.tokenizer)
    real = _build_store(cfg, real_inputs, tok, "documents", "real documents")
    split_file, heldout, sets = _split(cfg, real)

    synth = None
    syn_inputs: list[str] = []
    if _needs_synthetic(cfg):
        syn_inputs = _synthetic_inputs(cfg, inputs, split_file)
        synth = _build_store(cfg, syn_inputs, tok, "generations", "generations")
        if synth.manifest.get("tokenizer_fingerprint") != real.manifest.get("tokenizer_fingerprint"):
            raise BadInput("the real and synthetic stores were tokenized with different tokenizers (fix: data.rebuild=true)")

    # held-out hygiene by text: a training document repeating a held-out text is excluded like it
    hashes = _text_hashes(cfg, real, tok)
    duplicates = heldout_duplicates(real.arrow_column("source_id"), hashes, heldout)
    if duplicates:
        _log.warning(f"held-out hygiene: {len(duplicates)} documents repeat the text of a held-out document under "
                     f"another id (e.g. {sorted(duplicates)[0]!r}): excluded from training")
    if synth is not None:
        dropped = check_heldout_generations(synth.arrow_column("source_id"), heldout, bool(data.drop_heldout_generations), split_file)
        if dropped:
            _log.warning(f"dropping {dropped} generations of held-out documents from data.synthetic "
                         "(data.drop_heldout_generations=true)")
    excluded = heldout | duplicates
    # data.real_fraction: the sources it leaves out are excluded from every stream, like held-out ones
    fraction, seed = float(data.real_fraction), real_fraction_seed(cfg)
    left_out = cached_real_fraction(Path(data.cache_dir), real, excluded, fraction, seed, cached_only=_CACHED_ONLY.get())
    ru = cached_real_units(Path(data.cache_dir), real, excluded, fraction, seed, left_out,
                           cached_only=_CACHED_ONLY.get())
    ru.stats.update(heldout_sources_excluded=ru.stats["heldout_sources_excluded"] - len(left_out) - len(duplicates),
                    heldout_duplicates_excluded=len(duplicates), real_fraction_sources_excluded=len(left_out))
    not_trained = excluded | left_out
    su = None
    if synth is not None:  # built once per inputs and options, then memory-mapped from the cache
        # keyed by what determines the left-out sources, not their ids (the key of views without any stays)
        su = cached_view(Path(cfg.data.cache_dir), real, synth, opts, not_trained, encode=tok.encode,
                         rebuild=bool(data.rebuild), cached_only=_CACHED_ONLY.get(),
                         heldout_key=exclusion_key(real, excluded, fraction, seed) if fraction < 1 else None)
    val_units = _val_units(cfg, real, sets, tok)
    # held-out hygiene: no validation document may be a training source (by id), whatever the view
    check_units_disjoint([ru, su], val_units)
    _check_extra_sets_by_text(cfg, real, hashes, not_trained, tok)
    plan = make_plan(cfg, ru, su)
    fingerprint = dataset_fingerprint(cfg, [real] + ([synth] if synth is not None else []), split_file)
    paths = {"real": ",".join(real_inputs), "tokenizer": tok.path, "split": split_file, "real_store": real.path}
    if synth is not None:
        paths.update(synthetic=",".join(syn_inputs), synthetic_store=synth.path)
    for store in (real, synth):  # training reads no index column (read again on use): ~2 GB a rank at 100M documents
        if store is not None:
            store.release_columns()
    return PreparedData(cfg, tok, real, synth, split_file, heldout, ru, su, val_units, plan, fingerprint, paths)


def _text_hashes(cfg: DictConfig, store: Any, tok: Any) -> np.ndarray:
    return text_hashes(store, tok.tokenizer.decode_batch, Path(cfg.data.cache_dir) / "hygiene",
                       cached_only=_CACHED_ONLY.get())


def _check_extra_sets_by_text(cfg: DictConfig, real: Any, hashes: np.ndarray, excluded: set[str], tok: Any) -> None:
    """Refuse a data.val.extra set that repeats the text of a real training document."""
    extra = cfg.data.val.extra or {}
    if not extra:
        return
    import pyarrow as pa

    ids = real.arrow_column("source_id")
    train = ~member_mask(ids, excluded)
    sets = {}
    for name, path in extra.items():
        store = _build_store(cfg, _as_list(path), tok, "documents", f"validation set '{name}'")
        sets[str(name)] = (store.source_ids, _text_hashes(cfg, store, tok))
    check_content_disjoint(ids.filter(pa.array(train)), hashes[train], sets)


def prepare_data(cfg: DictConfig, inputs: Optional[CorpusInputs] = None) -> "MegadocDataModule":
    """The LightningDataModule of a validated recipe (``dm.prepared``: stores, split, units, plan);
    ``inputs`` as for :func:`prepare_corpus`."""
    return prepare_corpus(cfg, inputs).datamodule()


def _val_units(cfg: DictConfig, real, sets: dict[str, list[str]], tok: Any) -> dict[str, Units]:
    # Where each set's ids are in the store: Arrow finds the few listed ids among all of them.
    ids = real.arrow_column("source_id")
    listed = {str(s) for members in sets.values() for s in members}
    at = np.flatnonzero(member_mask(ids, listed))
    where = dict(zip(ids.take(at).to_pylist(), at.tolist()))
    out: dict[str, Units] = {}
    for name, members in sets.items():
        docs = np.array([where[s] for s in members if s in where], dtype=np.int64)
        if len(docs):
            out[name] = documents_units(real, docs, name)
    for name, path in (cfg.data.val.extra or {}).items():
        store = _build_store(cfg, _as_list(path), tok, "documents", f"validation set '{name}'")
        out[str(name)] = documents_units(store, None, str(name))
    return out


def make_plan(cfg: DictConfig, real: Units, synthetic: Optional[Units]) -> MixturePlan:
    """The mixture plan of a recipe from its streams' units (docs/data-corpus.md)."""
    tokens, units = {REAL: real.num_tokens}, {REAL: real.num_units}
    if synthetic is not None:
        tokens[SYNTHETIC], units[SYNTHETIC] = synthetic.num_tokens, synthetic.num_units
    return plan_from_sizes(cfg, tokens, units)


def plan_from_sizes(cfg: DictConfig, tokens: Mapping[str, int], units: Optional[Mapping[str, int]] = None) -> MixturePlan:
    """The mixture plan of a recipe from its streams' unique tokens per pass (and units, when known)."""
    mix = cfg.data.mixture
    G, T = int(cfg.train.global_batch_size), int(cfg.data.seq_len)
    units = dict(units or {})
    if mix.mode == "paper":
        return paper_plan(tokens[REAL], mix.real_epochs, mix.synthetic_fraction, G, T, tokens.get(SYNTHETIC),
                          units.get(REAL, 0), units.get(SYNTHETIC, 0))
    if mix.mode == "budget":
        return budget_plan(dict(tokens), G, T, mix.budget_tokens, OmegaConf.to_container(mix.stream_epochs),
                           OmegaConf.to_container(mix.stream_weights), units)
    raise ValueError(f"data.mixture.mode={mix.mode!r} is not one of paper, budget")


def real_fraction_seed(cfg: DictConfig) -> int:
    """The seed of the ``data.real_fraction`` draw: ``data.real_fraction_seed``, else ``train.data_seed``."""
    s = cfg.data.get("real_fraction_seed")
    return int(cfg.train.data_seed if s is None else s)


def run_steps(cfg: DictConfig, plan: MixturePlan) -> int:
    """Optimizer steps the run takes: ``train.max_steps`` when set (a prefix of the plan), else the plan's."""
    ms = cfg.train.max_steps
    return int(ms) if ms is not None else plan.steps


def dataset_fingerprint(cfg: DictConfig, stores: Sequence[Any], split_file: Path) -> str:
    """Hash of what decides every training window: the data section, store contents, split, seed.

    Paths are left out (the same data moved elsewhere resumes fine); contents are in.
    """
    from megadoc_pl.utils import file_fingerprint

    data = OmegaConf.to_container(cfg.data, resolve=True)
    for k in _RUNTIME_KEYS + ("real", "synthetic", "tokenizer", "val"):
        data.pop(k, None)
    stores_key = [{"inputs": [(f["sha256"], f["size"]) for f in s.manifest.get("inputs", [])],
                   **{k: s.manifest.get(k) for k in ("kind", "tokenizer_fingerprint", "num_tokens", "num_documents",
                                                     "add_bos", "add_eos")}} for s in stores]
    return json_fingerprint({"data": data, "data_seed": int(cfg.train.data_seed),
                             "attention_scope": str(cfg.model.attention_scope), "stores": stores_key,
                             "split": file_fingerprint(split_file)["sha256"]})

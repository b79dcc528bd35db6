"""Prompt templates: versioned text files in ``synth/prompts/``, replaceable with ``--prompt-dir``.

File format (UTF-8 text):

    # free comment lines at the top
    # version: 1
    [system]
    optional system message
    [user]
    user message with {{placeholders}}

Placeholders are ``{{name}}`` and are filled in one pass, so a value that itself contains
``{{...}}`` (or JSON braces) is never re-expanded. Every generated row records
``prompt_version`` = ``<name>/v<version>+<sha256 of the file, 8 hex>``, so an edited file is
distinguishable from the shipped one even when its version line was not bumped.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

PACKAGE_PROMPTS = Path(__file__).resolve().parent / "prompts"
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_SECTION = re.compile(r"^\[(system|user)\]\s*$")


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    version: str
    system: str | None
    user: str
    path: str
    sha256: str

    @property
    def prompt_version(self) -> str:
        return f"{self.name}/v{self.version}+{self.sha256[:8]}"

    @property
    def placeholders(self) -> set[str]:
        return set(_PLACEHOLDER.findall(self.user)) | set(_PLACEHOLDER.findall(self.system or ""))

    def render(self, **values: object) -> list[dict]:
        """Chat messages with every placeholder filled; a missing value is a ValueError."""
        missing = self.placeholders - set(values)
        if missing:
            raise ValueError(f"{self.path}: no value for placeholder(s) {sorted(missing)}")

        def fill(text: str) -> str:
            return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)

        messages = []
        if self.system:
            messages.append({"role": "system", "content": fill(self.system)})
        messages.append({"role": "user", "content": fill(self.user)})
        return messages


def parse_template(name: str, text: str, path: str) -> PromptTemplate:
    version = None
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        m = _SECTION.match(line)
        if m:
            current = m.group(1)
            if current in sections:
                raise ValueError(f"{path}:{lineno}: section [{current}] appears twice")
            sections[current] = []
        elif current is None:
            if line.startswith("# version:"):
                version = line.split(":", 1)[1].strip()
            elif line.strip() and not line.startswith("#"):
                raise ValueError(
                    f"{path}:{lineno}: text before the first [system]/[user] section "
                    "(fix: start comment lines with '#')"
                )
        else:
            sections[current].append(line)
    if version is None:
        raise ValueError(f"{path}: missing '# version: N' line above the sections")
    if "user" not in sections:
        raise ValueError(f"{path}: missing [user] section")
    system = "\n".join(sections.get("system", [])).strip() or None
    user = "\n".join(sections["user"]).strip()
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return PromptTemplate(name, version, system, user, path, sha)


def load_template(name: str, prompt_dir: str | Path | None = None) -> PromptTemplate:
    """The template ``<name>.txt`` from ``prompt_dir`` if it has one, else the shipped one."""
    candidates = []
    if prompt_dir is not None:
        if not Path(prompt_dir).is_dir():
            raise ValueError(f"--prompt-dir {prompt_dir}: not a directory")
        candidates.append(Path(prompt_dir) / f"{name}.txt")
    candidates.append(PACKAGE_PROMPTS / f"{name}.txt")
    for path in candidates:
        if path.is_file():
            return parse_template(name, path.read_text(encoding="utf-8"), str(path))
    shipped = sorted(p.stem for p in PACKAGE_PROMPTS.glob("*.txt"))
    raise ValueError(f"no prompt template '{name}' (shipped templates: {', '.join(shipped)})")

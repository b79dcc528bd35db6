"""megadoc_pl.synth"""

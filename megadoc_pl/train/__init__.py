"""megadoc_pl.train"""

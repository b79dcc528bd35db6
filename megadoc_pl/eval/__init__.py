"""megadoc_pl.eval"""

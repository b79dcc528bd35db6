"""megadoc_pl.demo"""

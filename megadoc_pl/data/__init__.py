"""megadoc_pl.data"""

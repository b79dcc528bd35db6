"""megadoc_pl.analysis"""

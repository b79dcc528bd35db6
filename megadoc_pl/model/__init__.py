"""megadoc_pl.model"""

"""A VM's protection state: the DR-side manifest and what may change it."""

"""Analyses and graph passes. Pure functions over FX graphs; never imports triton."""

"""Thin click commands: parse, validate, call a library function, print."""

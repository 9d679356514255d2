"""Thin APIRouters: parse, call serving, return."""

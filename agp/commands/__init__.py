"""Thin command modules for `agp`; each exposes `add_parser(subparsers)`."""

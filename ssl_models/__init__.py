"""Domains, backbones and self-supervised methods, each registered by its own module."""

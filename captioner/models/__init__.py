"""Encoder, mapper and decoder."""

"""Decoders from the reference papers, registered as segmentor heads (see :mod:`opentrans.models.heads`).

Importing this package registers every decoder module below it.
"""

"""Scoring generated images: FID / IS / KID / precision-recall and the reference statistics."""

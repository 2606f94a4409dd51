"""Extraction: options (ExtractOptions), patch geometry, the compiled patch kernel, extract and stitching."""

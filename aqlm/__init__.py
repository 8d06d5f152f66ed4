"""AQLM: additive quantization of language models, with a C core."""

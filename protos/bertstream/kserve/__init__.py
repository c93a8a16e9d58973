"""The KServe v2 / Triton inference protocol (package `inference`), served beside bertstream.v1."""

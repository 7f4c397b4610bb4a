"""The config: typed sections (`sections`, `cluster`) in one `schema`, loaded from YAML
(`loading`); model `shapes` as data; weight `constraints`."""

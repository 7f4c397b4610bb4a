"""The pipeline's wiring, its local runner and the CLI."""

from regmix.errors import ConfigError, CorpusError, DataError

# Mistakes in what the user handed over (config, corpus, CSVs): one line naming the fix and exit
# code 2, whether the CLI's checks or a pipeline stage found them
USER_ERRORS = (ConfigError, CorpusError, DataError)

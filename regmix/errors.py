"""The errors a user acts on, in two families.

`UserError`: a mistake in what the user handed over (config, corpus, CSVs). Its message names
the field or file and the fix; the CLI prints it as one line and exits with code 2, whether its
own checks or a pipeline stage found it. `ServiceError`: a service out of reach (MLflow here,
KFP in `regmix.pipelines.kfp_api`): one line, exit code 1.
"""


class UserError(ValueError):
    """A mistake in the user's input; the message names where and the fix."""


class ConfigError(UserError):
    """A configuration error; its message names the field and the fix."""


class CorpusError(UserError):
    """A corpus problem; the message names the domain or file and the fix."""


class DataError(UserError):
    """A CSV file that cannot be used; the message names the file, where, and the fix."""


class ServiceError(RuntimeError):
    """A service the run needs did not answer, or refused."""


class TrackingUnavailable(ServiceError):
    """MLflow did not answer after every retry."""

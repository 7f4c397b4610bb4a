"""Whether a server answers at a URL: checked before a run leans on it (MLflow, a package
index, a registry), so that a missing service is one line up front rather than a late failure."""

import urllib.error
import urllib.request


def http_status(url: str, timeout: float) -> int:
    """The HTTP status `url` answers with. An error status is an answer too (a registry's 401, a
    proxy's login page: a server is there). Raises OSError (urllib's URLError, a timeout) when
    nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code

"""MLflow: the client with retries, stage runs and queries (`runs`), and the plots every
stage draws."""

"""The one error a batch job reports: a message for the user, printed as `nereid batch: <message>`."""


class BatchError(Exception):
    """Bad input, unknown model, a failed request: the job stops with exit status 1."""

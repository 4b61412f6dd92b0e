"""The one error every data stage raises."""


class DataError(ValueError):
    """Bad or missing data file, unknown fields, or a partitioning that cannot work.

    The message names the file or setting and what would be accepted.
    """

"""The one exception the data side raises for bad input."""


class DataError(ValueError):
  """Bad input data: a missing or corrupt media file, an annotation record with a
  missing field, timestamps outside a video, a sample that cannot fit the batch.

  The message always names the file (and, for annotations, the record index/id and
  the field) so that a user can find and fix the offending input.
  """

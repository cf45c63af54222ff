"""Feature specifications, encoders and online stores."""

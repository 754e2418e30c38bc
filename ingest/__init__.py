"""Loading data sets into the online feature store (reads `models.data`, writes `feature_store`)."""

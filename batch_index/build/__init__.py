"""Building an index: shards in one process (`shards`) and the thin Spark job around it (`spark_job`)."""

"""Similarity queries over Kafka, answered by Spark Structured Streaming.

Modules, imported one way (later ones use earlier ones; nothing imports ``streaming`` from
``batch_index``): ``broker`` (topic and admin helpers, secret masking, the embedded Tansu broker),
``codec`` (wire format + validation at the door, schemas in ``schemas/``), ``scoring`` (answer one
batch, pure numpy), ``index_cache`` (versions and upgrades), ``sink`` (at-least-once publishing),
``kafka_source`` (PySpark data source on confluent-kafka), ``job`` (the streaming query), ``client``
and ``cli`` (``python -m streaming``). ``testing`` (fault-injection helpers for the reliability tests
and ``tools/fault_injection.py``) is imported by nothing in the service. Delivery semantics and the
reliability promises: ``docs/reliability.md``.
"""

"""Cluster mode: several gateway hosts sharing the device stream of a NATS JetStream cluster.

The device stream is the NATS server's own MQTT stream (``$MQTT_msgs``): a device's QoS 1
PUBACK means its message is stored there, replicated. A stream filled from it would be
filled fire-and-forget and loses acknowledged messages when its leader dies, so the
gateways consume ``$MQTT_msgs`` itself. An account mapping on the servers appends a
partition number to each device subject; each partition has one durable pull consumer
whose priority group (``pinned_client``) lets one gateway at a time pull it.

Modules:
    engine: names and subjects of the layout, the JetStream API requests, the version floor.
    setup: ``vitalgate cluster init`` (idempotent) and ``cluster status``.
    membership: live members in a KV bucket with TTL; rendezvous hashing of partitions.
    fence: ``partition_owners``, the epoch a partition's owner commits under, checked in
        the commit transaction so that a deposed owner commits nothing of the partition.
"""

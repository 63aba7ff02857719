"""The HL7 v2 device feed to the EHR: IHE PCD-01 numerics and PCD-04 alarms over MLLP.

``messages`` builds and reads the messages (pure); ``render`` turns an outbox row into one
with the device's profile; ``outbox`` owns the store-and-forward table (written in the
transactions of the data it reports); ``mllp`` is the connection to the receiver; ``feed``
is the gateway's task that fills the numerics and sends the outbox in order per patient.
"""

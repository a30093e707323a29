//! Fault tests against a private RabbitMQ node (filled in with the reconnect work).

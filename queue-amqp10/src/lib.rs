//! AMQP 1.0 (ActiveMQ Artemis, RabbitMQ) driver for the queue workspace, on fe2o3-amqp
#![warn(missing_docs)]

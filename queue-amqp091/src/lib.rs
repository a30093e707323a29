//! AMQP 0-9-1 (RabbitMQ) driver for the queue workspace, on lapin
#![warn(missing_docs)]

"""The Swoole + Redis + RabbitMQ chat protocol, served verbatim by a raw-mode app."""

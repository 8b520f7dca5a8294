"""Transports: how message bytes move between the server and its clients and helper aggregators
(in process, over child processes' pipes, over gRPC). Import the module you need: the package
itself imports nothing, so light processes (helper aggregators) do not load PyTorch."""

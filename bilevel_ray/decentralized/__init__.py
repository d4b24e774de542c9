"""Decentralized bilevel optimization: topologies, mixing matrices, gossip transports and backends."""

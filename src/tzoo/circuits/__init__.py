"""Circuits with replacement models: transcoders, attribution graphs, feature labels."""

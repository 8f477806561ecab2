"""Datasets and checks that tell whether explanations point at the right evidence."""

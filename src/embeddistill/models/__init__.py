"""The models: students, the dual-encoder teacher, cross-encoder teachers, and the fast encoding path they share.

A subpackage so that everything that *is* a network (as opposed to training it or evaluating it) sits in one
place; see docs/ARCHITECTURE.md for where each concept lives.
"""

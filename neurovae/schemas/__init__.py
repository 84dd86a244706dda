"""JSON schemas shipped with neurovae."""

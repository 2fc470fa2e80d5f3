"""The rotation function: cloud events in, the rotation state machine run."""

"""The bottom room: errors, file writing, seeds, the registry and field checks. Imports nothing else of the
project and no torch, so every other room may use it."""

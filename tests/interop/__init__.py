"""Helpers that run third-party peers (nghttpx, tinyproxy, Node.js) for interop tests."""

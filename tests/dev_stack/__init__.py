"""Tests of the local stack itself: the Gemini stand-in and its batch emulator."""

"""Media I/O: portrait decoding and buckets, speech decoding and checks, MP4 encoding and probing."""

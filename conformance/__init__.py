"""Conformance suite for contrastive-loss implementations (golden vectors and checks).

Reserved for the conformance suite (DESIGN section 6); it holds no checks yet.
"""

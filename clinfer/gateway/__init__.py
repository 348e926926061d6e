"""HTTP gateway and clinician web page in front of the real-time query client."""

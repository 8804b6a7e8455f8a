"""What goes to the phone: the serving model and its signatures, the TFLite format table and conversion, TFLite metadata, and the checks every written file gets."""

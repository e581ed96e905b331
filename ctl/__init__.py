"""ctl: Complete The Look, scene-based complementary product recommendation."""

// An independent maker of CloudStack-style console tokens, used by tests/test_cloudstack.py to check
// that consoleproxy decrypts tokens made with javax.crypto (the JDK) rather than with our own code.
//
// Usage: java CloudStackToken gcm|cbc <keyBase64> <ivBase64> <json>
//        java CloudStackToken cbc-hmac <keyBase64> <ivBase64> <json> <authKeyBase64>
//        java CloudStackToken ticket <hashKey> <host> <port> <sid> <tag> <sessionUuid> <minute>
// The ticket mode builds CloudStack's console access ticket the way its management server does:
// Base64(HmacSHA512(hashKey, "host=..&port=..&sid=..&tag=..&session=.." followed by the minute)).
// Keys are base64 in either alphabet, padding optional (as in the management server's key JSON).

import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.security.SecureRandom;
import java.util.Base64;
import javax.crypto.Cipher;
import javax.crypto.Mac;
import javax.crypto.spec.GCMParameterSpec;
import javax.crypto.spec.IvParameterSpec;
import javax.crypto.spec.SecretKeySpec;

public final class CloudStackToken {
    private CloudStackToken() {
    }

    private static byte[] decodeKey(String text) {
        String urlSafe = text.trim().replace('+', '-').replace('/', '_');
        return Base64.getUrlDecoder().decode(urlSafe);
    }

    private static String gcm(byte[] key, byte[] iv, byte[] plain) throws Exception {
        byte[] aesKey = MessageDigest.getInstance("SHA-256").digest(key);
        byte[] nonce = new byte[12];
        new SecureRandom().nextBytes(nonce);
        Cipher cipher = Cipher.getInstance("AES/GCM/NoPadding");
        cipher.init(Cipher.ENCRYPT_MODE, new SecretKeySpec(aesKey, "AES"), new GCMParameterSpec(128, nonce));
        cipher.updateAAD(iv);
        byte[] sealed = cipher.doFinal(plain); // ciphertext followed by the 16-byte tag
        byte[] out = new byte[nonce.length + sealed.length];
        System.arraycopy(nonce, 0, out, 0, nonce.length);
        System.arraycopy(sealed, 0, out, nonce.length, sealed.length);
        return Base64.getEncoder().encodeToString(out);
    }

    private static byte[] cbcEncrypt(byte[] key, byte[] iv, byte[] plain) throws Exception {
        Cipher cipher = Cipher.getInstance("AES/CBC/PKCS5Padding");
        cipher.init(Cipher.ENCRYPT_MODE, new SecretKeySpec(key, "AES"), new IvParameterSpec(iv));
        return cipher.doFinal(plain);
    }

    private static String cbc(byte[] key, byte[] iv, byte[] plain) throws Exception {
        return Base64.getUrlEncoder().withoutPadding().encodeToString(cbcEncrypt(key, iv, plain));
    }

    private static String cbcHmac(byte[] key, byte[] authKey, byte[] plain) throws Exception {
        byte[] iv = new byte[16];
        new SecureRandom().nextBytes(iv);
        byte[] ct = cbcEncrypt(key, iv, plain);
        Mac mac = Mac.getInstance("HmacSHA256");
        mac.init(new SecretKeySpec(authKey, "HmacSHA256"));
        mac.update(iv);
        mac.update(ct);
        byte[] tag = mac.doFinal();
        byte[] out = new byte[iv.length + ct.length + tag.length];
        System.arraycopy(iv, 0, out, 0, iv.length);
        System.arraycopy(ct, 0, out, iv.length, ct.length);
        System.arraycopy(tag, 0, out, iv.length + ct.length, tag.length);
        return Base64.getUrlEncoder().withoutPadding().encodeToString(out);
    }

    private static String ticket(String[] a) throws Exception {
        String params = "host=" + a[2] + "&port=" + a[3] + "&sid=" + a[4] + "&tag=" + a[5] + "&session=" + a[6];
        Mac mac = Mac.getInstance("HmacSHA512");
        mac.init(new SecretKeySpec(a[1].getBytes(StandardCharsets.UTF_8), "HmacSHA512"));
        mac.update(params.getBytes(StandardCharsets.UTF_8));
        mac.update(String.valueOf(Long.parseLong(a[7])).getBytes(StandardCharsets.UTF_8));
        return Base64.getEncoder().encodeToString(mac.doFinal());
    }

    public static void main(String[] args) throws Exception {
        if (args.length == 8 && args[0].equals("ticket")) {
            System.out.println(ticket(args));
            return;
        }
        if (args.length < 4) {
            System.err.println("usage: CloudStackToken gcm|cbc|cbc-hmac <key> <iv> <json> [<authKey>]");
            System.exit(2);
        }
        byte[] key = decodeKey(args[1]);
        byte[] iv = decodeKey(args[2]);
        byte[] plain = args[3].getBytes(StandardCharsets.UTF_8);
        String token;
        switch (args[0]) {
            case "gcm":
                token = gcm(key, iv, plain);
                break;
            case "cbc":
                token = cbc(key, iv, plain);
                break;
            case "cbc-hmac":
                if (args.length < 5) {
                    System.err.println("cbc-hmac needs an auth key");
                    System.exit(2);
                }
                token = cbcHmac(key, decodeKey(args[4]), plain);
                break;
            default:
                System.err.println("unknown mode " + args[0]);
                System.exit(2);
                return;
        }
        System.out.println(token);
    }
}
